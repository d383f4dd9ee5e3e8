"""The job queue on Redis Streams, for several nodes or gateways sharing one queue.

    queue = RedisJobQueue("redis://127.0.0.1:6379/0", prefix="edgegen:jobs:")

Layout, under the prefix:
    job:<id>              hash: the job, SQLite's row as fields (bodies and principal encrypted when a
                          keyring is set; jobs stored before principals were kept have none)
    ready:<priority>      stream per priority 0–9, consumer group `workers`: the jobs waiting to run
    delayed               sorted set, not_before → id: retries backing off
    leases                sorted set, lease_until → id: running jobs
    final                 sorted set, updated → id: finished jobs, for purging
    status:<status>       set of ids per status, for counts
    idem:<owner>:<key>    → id: idempotency keys
    open:<owner>          hash: `jobs` and `bytes` of the owner's unfinished jobs, for its allowance

Every state change is one Lua script, atomic on the server; a claim is one round trip. A worker reads
the highest-priority stream first with XREADGROUP (each entry goes to one consumer only); a job whose
lease expired gets a new stream entry (or fails, out of attempts). An entry is acknowledged and deleted
once its job leaves it (finished, retried, reclaimed, cancelled), so the streams hold only waiting and
running work. Times come from the caller's clock, as in the SQLite backend, so both pass the same tests.
Run Redis with `appendonly yes` for crash safety.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from edgegen.errors import Conflict
from edgegen.jobs.queue import Job, JobRequest, Status, backoff, new_job_id, over_allowance
from edgegen.security.atrest import Keyring
from edgegen.security.auth import Principal

PRIORITIES = range(9, -1, -1)  # claimed highest first
GROUP = "workers"

# A job that leaves the unfinished states (queued, running) gives its share of its owner's allowance back.
# Jobs stored before allowances were kept carry no `size` and were never counted.
_RELEASE = """
local function release(p, key)
  local size = redis.call('HGET', key, 'size')
  if not size then return end
  local open = p .. 'open:' .. redis.call('HGET', key, 'owner')
  if redis.call('HINCRBY', open, 'jobs', -1) <= 0 then
    redis.call('DEL', open)
  else
    redis.call('HINCRBY', open, 'bytes', -tonumber(size))
  end
end
"""

# KEYS: prefix. ARGV: id, owner, method, url, body, priority, now, idem, max_queued, max_queued_bytes,
# principal, traceparent.
# Returns {1, id, the job's hash as HGETALL gives it} when created, {0, …} for a known idempotency key,
# {-1, jobs, bytes} (the owner's unfinished jobs and their bytes) when the job is over its allowance.
_SUBMIT = """
local p = KEYS[1]
local id, owner, idem = ARGV[1], ARGV[2], ARGV[8]
if idem ~= '' then
  local found = redis.call('GET', p .. 'idem:' .. owner .. ':' .. idem)
  if found then return {0, found, redis.call('HGETALL', p .. 'job:' .. found)} end
end
local open = p .. 'open:' .. owner
local jobs = tonumber(redis.call('HGET', open, 'jobs') or '0')
local bytes = tonumber(redis.call('HGET', open, 'bytes') or '0')
local size = string.len(ARGV[5])
if jobs >= tonumber(ARGV[9]) or bytes + size > tonumber(ARGV[10]) then return {-1, jobs, bytes + size} end
if idem ~= '' then redis.call('SET', p .. 'idem:' .. owner .. ':' .. idem, id) end
redis.call('HINCRBY', open, 'jobs', 1)
redis.call('HINCRBY', open, 'bytes', size)
local entry = redis.call('XADD', p .. 'ready:' .. ARGV[6], '*', 'id', id)
redis.call('HSET', p .. 'job:' .. id, 'owner', owner, 'method', ARGV[3], 'url', ARGV[4], 'body', ARGV[5],
  'priority', ARGV[6], 'status', 'queued', 'attempts', 0, 'created', ARGV[7], 'updated', ARGV[7],
  'not_before', 0, 'progress', 0, 'idem', idem, 'entry', entry, 'size', size, 'principal', ARGV[11],
  'traceparent', ARGV[12])
redis.call('SADD', p .. 'status:queued', id)
return {1, id, redis.call('HGETALL', p .. 'job:' .. id)}
"""

# One claim, one round trip: move due retries into their streams and turn expired leases into new entries
# (or failures, out of attempts); then read the highest-priority stream that has an entry (XREADGROUP
# does not block inside a script) and start its job, skipping entries that went stale (their job was
# cancelled or re-queued since). KEYS: prefix. ARGV: now, max_attempts, worker, lease_until.
# Returns {id, the job's hash as HGETALL gives it}, or false when nothing waits.
_CLAIM = (
    _RELEASE
    + """
local p, now, max, worker, lease_until = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local function move(id, from, to)
  redis.call('SREM', p .. 'status:' .. from, id)
  redis.call('SADD', p .. 'status:' .. to, id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'delayed', '-inf', now)) do
  local key = p .. 'job:' .. id
  local entry = redis.call('XADD', p .. 'ready:' .. redis.call('HGET', key, 'priority'), '*', 'id', id)
  redis.call('HSET', key, 'entry', entry)
  redis.call('ZREM', p .. 'delayed', id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', '(' .. now)) do
  local key = p .. 'job:' .. id
  local priority = redis.call('HGET', key, 'priority')
  local stale = redis.call('HGET', key, 'entry')
  redis.call('XACK', p .. 'ready:' .. priority, 'workers', stale)
  redis.call('XDEL', p .. 'ready:' .. priority, stale)
  redis.call('ZREM', p .. 'leases', id)
  local attempts = tonumber(redis.call('HGET', key, 'attempts'))
  if attempts >= max then
    redis.call('HSET', key, 'status', 'failed', 'updated', now, 'lease_until', '', 'worker', '',
      'error', 'its worker stopped answering, ' .. attempts .. ' times')
    move(id, 'running', 'failed')
    release(p, key)
    redis.call('ZADD', p .. 'final', now, id)
  else
    local entry = redis.call('XADD', p .. 'ready:' .. priority, '*', 'id', id)
    redis.call('HSET', key, 'status', 'queued', 'updated', now, 'lease_until', '', 'worker', '',
      'entry', entry)
    move(id, 'running', 'queued')
  end
end
for priority = 9, 0, -1 do
  local stream = p .. 'ready:' .. priority
  while true do
    local read = redis.call('XREADGROUP', 'GROUP', 'workers', worker, 'COUNT', 1, 'STREAMS', stream, '>')
    if not read or #read[1][2] == 0 then break end
    local entry, fields = read[1][2][1][1], read[1][2][1][2]
    local id = fields[2]
    local key = p .. 'job:' .. id
    if redis.call('HGET', key, 'status') == 'queued' and redis.call('HGET', key, 'entry') == entry then
      redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('HSET', key, 'status', 'running', 'worker', worker, 'lease_until', lease_until,
        'updated', now)
      redis.call('ZADD', p .. 'leases', lease_until, id)
      move(id, 'queued', 'running')
      return {id, redis.call('HGETALL', key)}
    end
    redis.call('XACK', stream, 'workers', entry)
    redis.call('XDEL', stream, entry)
  end
end
return false
"""
)

# The lease holder only. KEYS: prefix. ARGV: id, worker, now, then per action.
_HOLDER = (
    _RELEASE
    + """
local p, id, worker, now = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'status') ~= 'running' or redis.call('HGET', key, 'worker') ~= worker then
  return 0
end
local action = ARGV[4]
if action == 'heartbeat' then
  redis.call('HSET', key, 'lease_until', ARGV[5], 'updated', now)
  if ARGV[6] ~= '' then redis.call('HSET', key, 'progress', ARGV[6]) end
  redis.call('ZADD', p .. 'leases', ARGV[5], id)
  return 1
end
redis.call('ZREM', p .. 'leases', id)
local stream = p .. 'ready:' .. redis.call('HGET', key, 'priority')
local entry = redis.call('HGET', key, 'entry')
redis.call('XACK', stream, 'workers', entry)
redis.call('XDEL', stream, entry)
redis.call('SREM', p .. 'status:running', id)
local status = ARGV[5]
redis.call('SADD', p .. 'status:' .. status, id)
redis.call('HSET', key, 'status', status, 'updated', now, 'lease_until', '')
if status ~= 'queued' then release(p, key) end
if action == 'finish' then
  redis.call('HSET', key, 'response_status', ARGV[6], 'response_body', ARGV[7], 'progress', 1)
  redis.call('ZADD', p .. 'final', now, id)
elseif action == 'release' then
  redis.call('HSET', key, 'worker', '', 'not_before', now)
  redis.call('HINCRBY', key, 'attempts', -1)
  redis.call('ZADD', p .. 'delayed', now, id)
elseif status == 'queued' then
  redis.call('HSET', key, 'worker', '', 'not_before', ARGV[7], 'error', ARGV[6])
  redis.call('ZADD', p .. 'delayed', ARGV[7], id)
else
  redis.call('HSET', key, 'error', ARGV[6])
  redis.call('ZADD', p .. 'final', now, id)
end
return 1
"""
)

# KEYS: prefix. ARGV: id, now.
_CANCEL = (
    _RELEASE
    + """
local p, id, now = KEYS[1], ARGV[1], ARGV[2]
local key = p .. 'job:' .. id
local status = redis.call('HGET', key, 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
release(p, key)
redis.call('HSET', key, 'status', 'cancelled', 'updated', now, 'lease_until', '')
local stream, entry = p .. 'ready:' .. redis.call('HGET', key, 'priority'), redis.call('HGET', key, 'entry')
redis.call('XACK', stream, 'workers', entry)
redis.call('XDEL', stream, entry)
redis.call('ZREM', p .. 'leases', id)
redis.call('ZREM', p .. 'delayed', id)
redis.call('SREM', p .. 'status:' .. status, id)
redis.call('SADD', p .. 'status:cancelled', id)
redis.call('ZADD', p .. 'final', now, id)
return 1
"""
)

# KEYS: prefix. ARGV: before. Returns how many were dropped.
_PURGE = """
local p = KEYS[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'final', '-inf', '(' .. ARGV[1])
for _, id in ipairs(ids) do
  local key = p .. 'job:' .. id
  local fields = redis.call('HMGET', key, 'owner', 'idem', 'status')
  if fields[2] and fields[2] ~= '' then redis.call('DEL', p .. 'idem:' .. fields[1] .. ':' .. fields[2]) end
  if fields[3] then redis.call('SREM', p .. 'status:' .. fields[3], id) end
  redis.call('DEL', key)
  redis.call('ZREM', p .. 'final', id)
end
return #ids
"""


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL's reply inside a script's answer: a flat list of names and values."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisJobQueue:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "edgegen:jobs:",
        max_attempts: int = 3,
        backoff_s: float = 1.0,
        keyring: Keyring | None = None,
        clock: Callable[[], float] = time.time,
        max_queued: int = 1000,
        max_queued_bytes: int = 64 * 2**20,
    ) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self.prefix, self.max_attempts, self.backoff_s = prefix, max_attempts, backoff_s
        self.keyring, self.clock = keyring, clock
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (("submit", _SUBMIT), ("claim", _CLAIM), ("holder", _HOLDER),
                                 ("cancel", _CANCEL), ("purge", _PURGE))
        }  # fmt: skip
        self._groups_ready = False

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._scripts[name](keys=[self.prefix], args=list(args))

    async def _groups(self) -> None:
        if self._groups_ready:
            return
        for priority in PRIORITIES:
            try:
                await self._redis.xgroup_create(
                    f"{self.prefix}ready:{priority}", GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    def _seal(self, job_id: str, what: str, data: bytes) -> bytes:
        return self.keyring.encrypt(data, f"job/{job_id}/{what}".encode()) if self.keyring else data

    def _open(self, job_id: str, what: str, data: bytes | None) -> bytes | None:
        if not data or self.keyring is None:
            return data
        return self.keyring.decrypt(data, f"job/{job_id}/{what}".encode())

    def _job(self, job_id: str, raw: dict[bytes, bytes]) -> Job:
        f = {k.decode(): v for k, v in raw.items()}

        def text(name: str) -> str | None:
            value = f.get(name, b"")
            return value.decode() if value else None

        def number(name: str) -> float | None:
            value = f.get(name, b"")
            return float(value) if value else None

        status_code = f.get("response_status", b"")
        principal = self._open(job_id, "principal", f.get("principal"))
        return Job(
            id=job_id,
            owner=f["owner"].decode(),
            request=JobRequest(
                f["method"].decode(), f["url"].decode(), self._open(job_id, "request", f["body"]) or b""
            ),
            priority=int(f["priority"]),
            status=Status(f["status"].decode()),
            attempts=int(f["attempts"]),
            created=float(f["created"]),
            updated=float(f["updated"]),
            not_before=number("not_before") or 0.0,
            lease_until=number("lease_until"),
            worker=text("worker"),
            response_status=int(status_code) if status_code else None,
            response_body=self._open(job_id, "response", f.get("response_body")),
            error=text("error"),
            idempotency_key=text("idem"),
            progress=number("progress") or 0.0,
            principal=Principal.from_record(principal) if principal else None,
            traceparent=text("traceparent"),
        )

    async def submit(
        self,
        owner: str,
        request: JobRequest,
        *,
        principal: Principal | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[Job, bool]:
        if priority not in PRIORITIES:
            raise ValueError("priority is 0 to 9")
        await self._groups()
        job_id = new_job_id()
        sealed = self._seal(job_id, "principal", principal.to_record()) if principal is not None else b""
        created, found, flat = await self._run(
            "submit", job_id, owner, request.method, request.url, self._seal(job_id, "request", request.body),
            priority, self.clock(), idempotency_key or "", self.max_queued, self.max_queued_bytes, sealed,
            traceparent or "",
        )  # fmt: skip
        if created == -1:
            refusal = over_allowance(owner, found, flat, self.max_queued, self.max_queued_bytes)
            assert refusal is not None
            raise refusal
        job = self._job(found.decode(), _fields(flat))
        if not created and job.request != request:
            raise Conflict("this Idempotency-Key was used for another request")
        return job, bool(created)

    async def get(self, job_id: str) -> Job | None:
        # (the client is made without decode_responses, so names and values come back as bytes)
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(f"{self.prefix}job:{job_id}"))
        return self._job(job_id, raw) if raw else None

    async def claim(self, worker: str, lease_s: float) -> Job | None:
        await self._groups()
        now = self.clock()
        claimed = await self._run("claim", now, self.max_attempts, worker, now + lease_s)
        if not claimed:
            return None
        job_id, flat = claimed
        return self._job(job_id.decode(), _fields(flat))

    async def heartbeat(
        self, job_id: str, worker: str, lease_s: float, progress: float | None = None
    ) -> bool:
        now = self.clock()
        done = await self._run(
            "holder", job_id, worker, now, "heartbeat", now + lease_s, "" if progress is None else progress
        )
        return bool(done)

    async def finish(self, job_id: str, worker: str, status_code: int, body: bytes) -> bool:
        status = Status.SUCCEEDED if status_code < 400 else Status.FAILED
        sealed = self._seal(job_id, "response", body)
        return bool(
            await self._run(
                "holder", job_id, worker, self.clock(), "finish", status.value, status_code, sealed
            )
        )

    async def release(self, job_id: str, worker: str) -> bool:
        return bool(await self._run("holder", job_id, worker, self.clock(), "release", "queued"))

    async def retry(self, job_id: str, worker: str, error: str) -> Job | None:
        job = await self.get(job_id)
        if job is None or job.worker != worker or job.status != Status.RUNNING:
            return None
        now = self.clock()
        if job.attempts >= self.max_attempts:
            done = await self._run("holder", job_id, worker, now, "retry", "failed", error, 0)
        else:
            not_before = now + backoff(job.attempts, self.backoff_s)
            done = await self._run("holder", job_id, worker, now, "retry", "queued", error, not_before)
        return await self.get(job_id) if done else None

    async def cancel(self, job_id: str) -> Job | None:
        await self._run("cancel", job_id, self.clock())
        return await self.get(job_id)

    async def purge(self, finished_before: float) -> int:
        return int(await self._run("purge", finished_before))

    async def counts(self) -> dict[str, int]:
        return {s.value: int(await self._redis.scard(f"{self.prefix}status:{s.value}")) for s in Status}

    async def close(self) -> None:
        await self._redis.aclose()
