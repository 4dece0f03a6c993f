package sandbox

import (
	"context"
	"time"
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
