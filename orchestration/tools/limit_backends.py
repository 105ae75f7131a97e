"""Where rate-limit buckets and circuits live: Redis (shared by every worker process, changed
only by the Lua scripts below, so each change is atomic) or memory (embedded mode: one process,
the same algorithms under a lock). :mod:`orchestration.tools.limits` is the interface.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from django.conf import settings

from orchestration.errors import Code, TransientError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
#: The rolling window of a circuit is counted in this many slots.
WINDOW_SLOTS = 10


class Backend(Protocol):
    """A store of buckets and circuits; every method is one atomic step."""

    def bucket_take(self, provider: str, per_second: float, burst: int, now: float) -> float: ...
    def bucket_read(self, provider: str) -> tuple[float | None, float | None]: ...
    def circuit_acquire(
        self, provider: str, now: float, cooldown: float, probe_ttl: float, probe_id: str
    ) -> list[str]: ...
    def circuit_record(
        self,
        provider: str,
        now: float,
        ok: bool,
        probe_id: str,
        rate: float,
        min_calls: int,
        window: float,
    ) -> list[str]: ...
    def circuit_release(self, provider: str, probe_id: str) -> None: ...
    def circuit_read(self, provider: str) -> tuple[dict[str, str], dict[str, str]]: ...
    def reset(self, provider: str) -> None: ...


# --- Redis --------------------------------------------------------------------------------------

TOKEN_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(held[1]), tonumber(held[2])
if tokens == nil or ts == nil then
  tokens, ts = burst, now
elseif now > ts then
  tokens, ts = math.min(burst, tokens + (now - ts) * rate), now
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', ts))
-- A bucket idle this long is full again: the key then carries nothing.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""

CIRCUIT_ACQUIRE = """
local now = tonumber(ARGV[1])
local c = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probe_deadline')
local state = c[1] or 'closed'
if state == 'closed' then return {'call', 'closed', ''} end
local deadline = string.format('%.6f', now + tonumber(ARGV[3]))
if state == 'open' then
  if now < tonumber(c[2]) + tonumber(ARGV[2]) then return {'reject', 'open', ''} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_id', ARGV[4], 'probe_deadline', deadline,
             'changed_at', string.format('%.6f', now))
  return {'probe', 'half_open', 'open'}
end
if now < (tonumber(c[3]) or 0) then return {'reject', 'half_open', ''} end
redis.call('HSET', KEYS[1], 'probe_id', ARGV[4], 'probe_deadline', deadline)
return {'probe', 'half_open', ''}
"""

CIRCUIT_RECORD = """
local now, ok, probe = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local stamp = string.format('%.6f', now)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if probe ~= '' then
  if state ~= 'half_open' or redis.call('HGET', KEYS[1], 'probe_id') ~= probe then return {state, '', '0', '0'} end
  redis.call('HDEL', KEYS[1], 'probe_id', 'probe_deadline')
  if ok then
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'state', 'closed', 'changed_at', stamp)
    return {'closed', 'half_open', '0', '0'}
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', stamp, 'changed_at', stamp)
  return {'open', 'half_open', '0', '0'}
end
-- Calls that started before the circuit opened report late; they change nothing.
if state ~= 'closed' then return {state, '', '0', '0'} end
local window = tonumber(ARGV[6])
local width = window / tonumber(ARGV[7])
local slot = math.floor(now / width)
redis.call('HINCRBY', KEYS[2], 'c:' .. slot, 1)
if not ok then redis.call('HINCRBY', KEYS[2], 'f:' .. slot, 1) end
redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000) + 1000)
local oldest = slot - tonumber(ARGV[7]) + 1
local calls, failures = 0, 0
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local name = flat[i]
  if tonumber(string.sub(name, 3)) < oldest then
    redis.call('HDEL', KEYS[2], name)
  elseif string.sub(name, 1, 1) == 'c' then
    calls = calls + tonumber(flat[i + 1])
  else
    failures = failures + tonumber(flat[i + 1])
  end
end
if not ok and calls >= tonumber(ARGV[5]) and failures >= calls * tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', stamp, 'changed_at', stamp)
  return {'open', 'closed', tostring(calls), tostring(failures)}
end
return {'closed', '', tostring(calls), tostring(failures)}
"""

CIRCUIT_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' and redis.call('HGET', KEYS[1], 'probe_id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'probe_deadline', '0')
end
return 0
"""


def _keys(provider: str) -> tuple[str, str, str]:
    # One hash tag per provider keeps its keys on one Redis Cluster slot (scripts touch two).
    base = f"signalbox:tool:{{{provider}}}"
    return f"{base}:bucket", f"{base}:circuit", f"{base}:window"


@contextmanager
def _redis_errors_are_transient() -> Iterator[None]:
    # Without the shared state no call may go out (limits would not hold); try again later.
    import redis

    try:
        yield
    except redis.RedisError as exc:
        raise TransientError(
            f"rate limits and circuits are unavailable: {exc}", code=Code.LIMITS_UNAVAILABLE
        ) from exc


class RedisBackend:
    """Limits and circuits in Redis, changed only by the scripts above."""

    def __init__(self, url: str):
        import redis

        # redis-py reconnects in a forked child by itself (the pool checks its pid).
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        self._take = self.client.register_script(TOKEN_BUCKET)
        self._acquire = self.client.register_script(CIRCUIT_ACQUIRE)
        self._record = self.client.register_script(CIRCUIT_RECORD)
        self._release = self.client.register_script(CIRCUIT_RELEASE)

    def bucket_take(self, provider: str, per_second: float, burst: int, now: float) -> float:
        args: list[float | str] = [per_second, burst, f"{now:.6f}"]
        with _redis_errors_are_transient():
            return float(self._take(keys=[_keys(provider)[0]], args=args))

    def bucket_read(self, provider: str) -> tuple[float | None, float | None]:
        with _redis_errors_are_transient():
            tokens, ts = self.client.hmget(_keys(provider)[0], ["tokens", "ts"])
        return (float(tokens) if tokens else None, float(ts) if ts else None)

    def circuit_acquire(
        self, provider: str, now: float, cooldown: float, probe_ttl: float, probe_id: str
    ) -> list[str]:
        args: list[float | str] = [f"{now:.6f}", cooldown, probe_ttl, probe_id]
        with _redis_errors_are_transient():
            return list(self._acquire(keys=[_keys(provider)[1]], args=args))

    def circuit_record(
        self,
        provider: str,
        now: float,
        ok: bool,
        probe_id: str,
        rate: float,
        min_calls: int,
        window: float,
    ) -> list[str]:
        _, circuit, counts = _keys(provider)
        args = [f"{now:.6f}", "1" if ok else "0", probe_id, rate, min_calls, window, WINDOW_SLOTS]
        with _redis_errors_are_transient():
            return list(self._record(keys=[circuit, counts], args=args))

    def circuit_release(self, provider: str, probe_id: str) -> None:
        with _redis_errors_are_transient():
            self._release(keys=[_keys(provider)[1]], args=[probe_id])

    def circuit_read(self, provider: str) -> tuple[dict[str, str], dict[str, str]]:
        _, circuit, counts = _keys(provider)
        with _redis_errors_are_transient(), self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(circuit)
            pipe.hgetall(counts)
            found, window = pipe.execute()
        return found, window

    def reset(self, provider: str) -> None:
        self.client.delete(*_keys(provider))


# --- in memory (embedded mode) ------------------------------------------------------------------


class MemoryBackend:
    """The same algorithms for a single process without Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._circuits: dict[str, dict[str, str]] = {}
        self._windows: dict[str, dict[str, str]] = {}

    def bucket_take(self, provider: str, per_second: float, burst: int, now: float) -> float:
        with self._lock:
            tokens, ts = self._buckets.get(provider, (float(burst), now))
            if now > ts:
                tokens, ts = min(burst, tokens + (now - ts) * per_second), now
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / per_second
            self._buckets[provider] = (tokens, ts)
            return wait

    def bucket_read(self, provider: str) -> tuple[float | None, float | None]:
        with self._lock:
            return self._buckets.get(provider, (None, None))

    def circuit_acquire(
        self, provider: str, now: float, cooldown: float, probe_ttl: float, probe_id: str
    ) -> list[str]:
        with self._lock:
            circuit = self._circuits.setdefault(provider, {})
            state = circuit.get("state", CLOSED)
            if state == CLOSED:
                return ["call", CLOSED, ""]
            if state == OPEN:
                if now < float(circuit["opened_at"]) + cooldown:
                    return ["reject", OPEN, ""]
                circuit.update(
                    state=HALF_OPEN,
                    probe_id=probe_id,
                    probe_deadline=str(now + probe_ttl),
                    changed_at=str(now),
                )
                return ["probe", HALF_OPEN, OPEN]
            if now < float(circuit.get("probe_deadline") or 0):
                return ["reject", HALF_OPEN, ""]
            circuit.update(probe_id=probe_id, probe_deadline=str(now + probe_ttl))
            return ["probe", HALF_OPEN, ""]

    def circuit_record(
        self,
        provider: str,
        now: float,
        ok: bool,
        probe_id: str,
        rate: float,
        min_calls: int,
        window: float,
    ) -> list[str]:
        with self._lock:
            circuit = self._circuits.setdefault(provider, {})
            state = circuit.get("state", CLOSED)
            if probe_id:
                if state != HALF_OPEN or circuit.get("probe_id") != probe_id:
                    return [state, "", "0", "0"]
                circuit.pop("probe_id", None)
                circuit.pop("probe_deadline", None)
                if ok:
                    self._windows.pop(provider, None)
                    circuit.update(state=CLOSED, changed_at=str(now))
                    return [CLOSED, HALF_OPEN, "0", "0"]
                circuit.update(state=OPEN, opened_at=str(now), changed_at=str(now))
                return [OPEN, HALF_OPEN, "0", "0"]
            if state != CLOSED:
                return [state, "", "0", "0"]
            counts = self._windows.setdefault(provider, {})
            slot = int(now // (window / WINDOW_SLOTS))
            for name in ("c",) if ok else ("c", "f"):
                counts[f"{name}:{slot}"] = str(int(counts.get(f"{name}:{slot}", "0")) + 1)
            for name in [n for n in counts if int(n[2:]) <= slot - WINDOW_SLOTS]:
                del counts[name]
            calls, failures = window_totals(counts)
            if not ok and calls >= min_calls and failures >= calls * rate:
                self._windows.pop(provider, None)
                circuit.update(state=OPEN, opened_at=str(now), changed_at=str(now))
                return [OPEN, CLOSED, str(calls), str(failures)]
            return [CLOSED, "", str(calls), str(failures)]

    def circuit_release(self, provider: str, probe_id: str) -> None:
        with self._lock:
            circuit = self._circuits.get(provider, {})
            if circuit.get("state") == HALF_OPEN and circuit.get("probe_id") == probe_id:
                circuit["probe_deadline"] = "0"

    def circuit_read(self, provider: str) -> tuple[dict[str, str], dict[str, str]]:
        with self._lock:
            return dict(self._circuits.get(provider, {})), dict(self._windows.get(provider, {}))

    def reset(self, provider: str) -> None:
        with self._lock:
            for store in (self._buckets, self._circuits, self._windows):
                store.pop(provider, None)


def window_totals(counts: dict[str, str]) -> tuple[int, int]:
    calls = sum(int(v) for k, v in counts.items() if k.startswith("c:"))
    failures = sum(int(v) for k, v in counts.items() if k.startswith("f:"))
    return calls, failures


_backends: dict[str, Backend] = {}
_backends_lock = threading.Lock()


def backend_default() -> Backend:
    """Redis when ``settings.REDIS_URL`` is set (shared by every process), else in memory."""
    url = getattr(settings, "REDIS_URL", "") or ""
    with _backends_lock:
        if url not in _backends:
            _backends[url] = RedisBackend(url) if url else MemoryBackend()
        return _backends[url]
