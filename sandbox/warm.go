package sandbox

import (
	"context"
	"errors"
	"time"

	"github.com/safe-py/safepy/internal/pool"
)

// warmJail is a jail as a pool holds it (internal/pool): the pool decides when to start jails and which kind,
// the runner how.
type warmJail struct{ *jail }

func (w warmJail) AwaitReady(ctx context.Context) error {
	err := w.awaitReady(ctx)
	if err != nil {
		w.finish(false, err)
	}
	return err
}

func (w warmJail) Alive() bool        { return w.alive() }
func (w warmJail) Began() time.Time   { return w.begin }
func (w warmJail) ReadyAt() time.Time { return w.readyAt }
func (w warmJail) Discard()           { w.discard() }

var errNoForkServer = errors.New("no fork server for the pool")

// newPool starts a pool of warm jails that import preload before they are ready.
func newPool(r *Runner, size int, maxAge time.Duration, preload []string) *pool.Pool[warmJail] {
	return pool.New(pool.Config[warmJail]{
		Size:   size,
		MaxAge: maxAge,
		Fork: func(prefault bool) (warmJail, error) {
			fs := r.forks.server(preload)
			if fs == nil {
				return warmJail{}, errNoForkServer
			}
			j, err := r.launchForked(fs, preload, prefault)
			if err != nil {
				r.logForkFailure(err)
				return warmJail{}, err
			}
			return warmJail{j}, nil
		},
		Start: func() (warmJail, error) {
			j, err := r.launch(preload, true)
			return warmJail{j}, err
		},
		Busy: r.cfg.Busy,
		Turn: r.refilling,
	})
}
