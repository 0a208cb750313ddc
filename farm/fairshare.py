"""Fair share between users in a lane, by GPU-seconds: enlist, charge, settle, choose.

One sorted set per lane (`keys.lane_shares`) holds each user's GPU-seconds:
1. `enlist`: a job joins its lane; a user who had nothing running there starts
   NEWCOMER_CREDIT GPU-seconds below the least-served active user, so a small job
   runs at once and a big one shares evenly once the credit is spent;
2. `charge`: the feeder charges a chunk when it sends it, at the job's measured
   seconds per item (DEFAULT_SECONDS_PER_ITEM before it has one);
3. `settle`: the worker that rendered it settles the difference with the seconds it took;
4. `choose_user`: the feeder serves the user charged least (the oldest job breaks ties).
"""

from __future__ import annotations

from dataclasses import dataclass
import redis

from farm import keys, pool

#: Seconds of charge per item before a job has measured its own.
DEFAULT_SECONDS_PER_ITEM = 1.0
#: GPU-seconds of head start for a user who joins a lane where others are running.
NEWCOMER_CREDIT = 60.0


@dataclass(frozen=True)
class Charge:
    """What a chunk was charged when it was sent, carried in its message so the worker settles it."""

    lane: str
    user: str
    seconds: float

    def to_dict(self) -> dict:
        return {"lane": self.lane, "user": self.user, "charge": round(self.seconds, 4)}

    @classmethod
    def from_dict(cls, data: dict) -> "Charge | None":
        """The charge in a chunk message, or None for one sent without (a test's, an old feeder's)."""
        if not data.get("user") or data.get("lane") not in keys.LANES:
            return None
        return cls(lane=data["lane"], user=str(data["user"]), seconds=float(data.get("charge", 0.0)))


def enlist(board, job_id: str, lane: str, user: str, created: float) -> None:
    """Put a job in its lane, with the newcomer's credit if its user had nothing running there,
    and wake the feeder. `board` is a farm.jobs.JobBoard (it reads the lane's jobs)."""
    client = board.redis
    active = active_users(board, lane)
    scores = {u.decode(): s for u, s in client.zrange(keys.lane_shares(lane), 0, -1, withscores=True)}
    if user not in active:
        floor = min((scores.get(u, 0.0) for u in active), default=0.0) - NEWCOMER_CREDIT
        # Never below the user's own charge: old use is forgotten, not credited.
        client.zadd(keys.lane_shares(lane), {user: max(floor, scores.get(user, floor)) if active else 0.0})
    client.zadd(keys.lane_jobs(lane), {job_id: created})
    pool.wake(client, job_id)


def active_users(board, lane: str) -> set[str]:
    """Users with a runnable job in the lane."""
    jobs = [j.decode() for j in board.redis.zrange(keys.lane_jobs(lane), 0, -1)]
    return {h.user for h in board.headers(jobs) if h is not None and h.user and h.state.runnable}


def choose_user(client: redis.Redis, lane: str, oldest_job: dict[str, float]) -> str:
    """The user charged least in the lane, among `oldest_job` (user -> their oldest job's time)."""
    users = sorted(oldest_job)
    shares = dict(zip(users, client.zmscore(keys.lane_shares(lane), users)))
    return min(users, key=lambda u: (shares.get(u) or 0.0, oldest_job[u]))


def charge(pipe, lane: str, user: str, items: int, seconds_per_item: float | None) -> Charge:
    """Charge a chunk of `items` to its user, on the caller's pipeline."""
    amount = Charge(lane, user, items * (seconds_per_item or DEFAULT_SECONDS_PER_ITEM))
    pipe.zincrby(keys.lane_shares(lane), amount.seconds, user)
    return amount


def settle(pipe, charged: Charge | None, seconds: float) -> None:
    """The chunk took `seconds`: correct its user's share by the difference, on the caller's pipeline."""
    if charged is not None:
        pipe.zincrby(keys.lane_shares(charged.lane), seconds - charged.seconds, charged.user)

