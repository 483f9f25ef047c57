"""The reconciler's steps, one module each; workers.reconciler runs them in order every tick."""
