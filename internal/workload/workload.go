// Package workload is a mix of good and hostile scripts, each with the answer the contract requires. The soak
// test and the load command drive the service with it.
package workload

// Script is one entry of the mix.
type Script struct {
	Name   string
	Source string
	Status int    // the HTTP status it must get
	Type   string // the error type it must get, "" on success
	Weight int    // how many of it in every round of the mix
}

// Mix is mostly ordinary work with every kind of attack in it, and a few scripts that run into the wall time.
var Mix = []Script{
	{"hello", "def main():\n    print('hello')\n    return {'ok': True}\n", 200, "", 20},
	{"numpy", "import numpy as np\ndef main():\n    return int(np.arange(10).sum())\n", 200, "", 5},
	{"pandas", "import pandas as pd\ndef main():\n    return int(pd.DataFrame({'a': [1, 2, 3]})['a'].sum())\n", 200, "", 2},
	{"exception", "def main():\n    raise ValueError('no')\n", 422, "ExecutionError", 3},
	{"syntax error", "def main(:\n", 422, "ExecutionError", 2},
	{"fork bomb", "import os\ndef main():\n    while True:\n        os.fork()\n", 422, "ResourceLimitError", 2},
	{"memory bomb", "def main():\n    xs = []\n    while True:\n        xs.append(bytearray(1 << 20))\n", 422, "ResourceLimitError", 2},
	{"stdout flood", "import os\ndef main():\n    for _ in range(8):\n        os.write(1, b'x' * (1 << 20))\n    return 1\n", 200, "", 2},
	{"result too large", "def main():\n    return 'r' * (2 << 20)\n", 422, "ResourceLimitError", 2},
	{"os._exit", "import os\ndef main():\n    os._exit(3)\n", 422, "ExecutionError", 2},
	{"segfault", "import ctypes\ndef main():\n    ctypes.string_at(0)\n", 422, "ExecutionError", 2},
	{"disk filler", "import os\ndef main():\n    os.symlink('/etc/passwd', '/sandbox/p')\n    for i in range(5):\n        open('/tmp/f%d' % i, 'wb').write(b'x' * (8 << 20))\n", 422, "ResourceLimitError", 2},
	{"detached child", "import subprocess\ndef main():\n    subprocess.Popen(['/usr/local/bin/python3', '-c', 'import os, time; os.setsid(); time.sleep(60)'])\n    return 'left a child'\n", 200, "", 2},
	{"not serializable", "def main():\n    return {1}\n", 422, "SerializationError", 2},
	{"sleeper", "import time\ndef main():\n    time.sleep(60)\n", 422, "TimeoutError", 1},
}

// Round returns the indexes of Mix in one round, each as often as its weight, interleaved.
func Round() []int {
	var round []int
	for left := true; left; {
		left = false
		for i, s := range Mix {
			n := 0
			for _, j := range round {
				if j == i {
					n++
				}
			}
			if n < s.Weight {
				round = append(round, i)
				left = true
			}
		}
	}
	return round
}

// Examples are the contract's three example scripts, each with main()'s exact answer.
var Examples = []Script{
	{"hello", "def main():\n    print('hello')\n    return {'ok': True}\n", 200, "", 1},
	{"numpy", "def main():\n    import numpy as np\n    print(np.arange(3))\n    return {\"sum\": int(np.sum([1,2,3])) }\n", 200, "", 1},
	{"pandas", "def main():\n    import os, pandas as pd\n    print(list(sorted(os.listdir(\"/\")))[:5])\n    return { \"rows\": int(pd.DataFrame({\"a\":[1,2,3]}).shape[0]) }\n", 200, "", 1},
}

// Plot reads a CSV the request sends (PlotCSV, as data.csv) with pandas, plots it with matplotlib and saves the
// figure as plot.png, which the answer carries back.
var Plot = Script{"plot", `import pandas as pd
import matplotlib.pyplot as plt
def main():
    df = pd.read_csv("data.csv")
    fig, ax = plt.subplots(figsize=(4, 3))
    df.plot(x="day", y="visits", ax=ax)
    fig.savefig("plot.png")
    return {"rows": len(df), "mean": float(df["visits"].mean())}
`, 200, "", 1}

// PlotCSV is the data Plot draws.
const PlotCSV = "day,visits\n1,120\n2,135\n3,128\n4,160\n5,171\n6,150\n7,190\n"
