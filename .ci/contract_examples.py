"""Checks a running server against the contract's four examples (CONTRACT.md, "Examples every release must answer
exactly so"): status, JSON content type, and the body equal as a JSON value, strings byte for byte.

    python3 .ci/contract_examples.py PORT

Only ever talks to 127.0.0.1. Exits 1 and says which example differed, and how, on the first difference.
"""

import json
import sys
import urllib.error
import urllib.request

EXAMPLES = [
    ("hello",
     r'''{"script":"def main():\n    print('hello')\n    return {'ok': True}\n"}''',
     200, {"result": {"ok": True}, "stdout": "hello\n"}),
    ("numpy",
     r'''{"script":"def main():\n    import numpy as np\n    print(np.arange(3))\n    return {\"sum\": int(np.sum([1,2,3])) }\n"}''',
     200, {"result": {"sum": 6}, "stdout": "[0 1 2]\n"}),
    ("pandas",
     r'''{"script":"def main():\n    import os, pandas as pd\n    print(list(sorted(os.listdir(\"/\")))[:5])\n    return { \"rows\": int(pd.DataFrame({\"a\":[1,2,3]}).shape[0]) }\n"}''',
     200, {"result": {"rows": 3}, "stdout": "['bin', 'dev', 'lib', 'lib64', 'proc']\n"}),
    ("empty object", "{}",
     400, {"error": {"type": "ValidationError", "message": "missing 'script' field"}}),
]


def strict(pairs):
    """A JSON object with a key twice is not the contract's answer, whatever its last value."""
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in %r" % keys)
    return dict(pairs)


def same(a, b):
    """Equal as JSON values: no True == 1 or 1 == 1.0 coincidences."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main():
    port = int(sys.argv[1])
    for name, body, status, want in EXAMPLES:
        req = urllib.request.Request("http://127.0.0.1:%d/execute" % port, data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                got_status, ctype, raw = r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            got_status, ctype, raw = e.code, e.headers.get("Content-Type", ""), e.read()
        problems = []
        if got_status != status:
            problems.append("status %d, want %d" % (got_status, status))
        if not ctype.startswith("application/json"):
            problems.append("Content-Type %r, want application/json" % ctype)
        try:
            got = json.loads(raw.decode("utf-8"), object_pairs_hook=strict)
            if not same(got, want):
                problems.append("body %s, want %s" % (json.dumps(got), json.dumps(want)))
        except ValueError as e:
            problems.append("body %r is not JSON: %s" % (raw, e))
        if problems:
            print("contract example %r: %s" % (name, "; ".join(problems)), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
