"""The beat scheduler: RedBeat, made to ride out a Redis outage or a Redis that restarts empty.

Plain RedBeat ends the beat process on the first tick that cannot reach Redis, and a Redis that
comes back empty (ours keeps nothing on disk) has lost both RedBeat's lock and its schedule, so
even a beat that survived would never send a task again. Here:
- a tick that cannot reach Redis logs it and tries again after `max_interval`;
- a schedule gone from Redis is written again from the configuration;
- a lock gone from Redis is taken again; if another beat took it meanwhile, this one exits
  (its supervisor starts it again, and it then waits for the lock as any second beat does).
"""

import logging
from datetime import datetime
from typing import Any

import redis
from redbeat import RedBeatScheduler
from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, RedBeatSchedulerEntry, ensure_conf, get_redis

logger = logging.getLogger(__name__)


class RestartSafeRedBeatScheduler(RedBeatScheduler):
    lock: Any  # RedBeat's redis lock, None until made

    def tick(self, min=min, **kwargs):
        try:
            client = get_redis(self.app)
            if not client.exists(self.app.redbeat_conf.statics_key):
                logger.warning("beat: the schedule is gone from Redis (restarted empty?); writing it again")
                self.setup_schedule()
            if self.lock_key:
                self.hold_lock(client)
            return super().tick(min=min, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            logger.warning("beat: Redis unreachable (%s); trying again in %ss", error, self.max_interval)
            return self.max_interval

    def hold_lock(self, client) -> None:
        if self.lock is not None and self.lock.owned():
            return
        if self.lock is None:  # Redis was down when the beat started: RedBeat could not make its lock
            self.lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
            self.lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not self.lock.acquire(blocking=False):
            raise SystemExit("beat: another beat took the lock while Redis was away; exiting")
        logger.warning("beat: took the beat lock again (Redis lost it)")


def send_lags(app, now: datetime) -> dict[str, tuple[float | None, float]]:
    """For each entry of the beat schedule: seconds since beat last sent it (None if never, or if
    Redis lost it), and its interval. Read from RedBeat's own records in Redis, which only the beat
    holding the lock writes, so a live process that no longer sends (stuck, lock lost) shows as late."""
    lags: dict[str, tuple[float | None, float]] = {}
    prefix = ensure_conf(app).key_prefix
    for name, definition in app.conf.beat_schedule.items():
        interval = float(definition["schedule"])
        try:
            entry = RedBeatSchedulerEntry.from_key(prefix + name, app=app)
        except KeyError:  # not in Redis: never written, or Redis restarted empty
            lags[name] = (None, interval)
            continue
        last = entry.last_run_at
        lags[name] = (None if last is None else (now - last).total_seconds(), interval)
    return lags


def late_entries(lags: dict[str, tuple[float | None, float]], slack_seconds: float) -> list[str]:
    """The entries not sent within three intervals (and the slack): what a healthcheck fails on."""
    return [
        f"{name}: {'never sent' if lag is None else f'last sent {lag:.0f} s ago'} (every {interval:g} s)"
        for name, (lag, interval) in lags.items()
        if lag is None or lag > 3 * interval + slack_seconds
    ]
