"""Django's PostgreSQL backend, with connections checked before use in long-lived processes (see base)."""
