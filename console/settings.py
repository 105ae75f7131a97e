"""Signalbox settings: one environment-driven module that refuses bad values at start-up.

With no environment at all it runs embedded: a SQLite file, an in-process broker and channel
layer. Set ``DATABASE_URL`` and ``REDIS_URL`` for production (PostgreSQL + Redis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


class _Env(environ.Env):
    """django-environ's reader; a value that is not of its type is refused naming its variable
    (django-environ raises a bare ``ValueError`` that says neither which nor what)."""

    def get_value(
        self,
        var: str,
        cast: Any = None,
        default: Any = environ.Env.NOTSET,
        parse_default: bool = False,
    ) -> Any:
        try:
            return super().get_value(var, cast=cast, default=default, parse_default=parse_default)
        except ValueError as exc:
            kind = {int: "a whole number", float: "a number", bool: "true or false"}.get(
                cast, "valid"
            )
            raise ImproperlyConfigured(
                f"{var} must be {kind}, not {self.ENVIRON.get(var, '')!r}"
            ) from exc


env = _Env()

SIGNALBOX_ENV = env.str("SIGNALBOX_ENV", default="development")
if SIGNALBOX_ENV not in {"development", "test", "production"}:
    raise ImproperlyConfigured(
        f"SIGNALBOX_ENV must be development, test or production, not {SIGNALBOX_ENV!r}"
    )
PRODUCTION = SIGNALBOX_ENV == "production"

DEBUG = env.bool("DEBUG", default=not PRODUCTION and SIGNALBOX_ENV != "test")
if PRODUCTION:
    SECRET_KEY = env.str("SECRET_KEY")  # no default: production refuses to start without one
    if len(SECRET_KEY) < 50 or SECRET_KEY.startswith("django-insecure"):
        raise ImproperlyConfigured("SECRET_KEY must be at least 50 random characters in production")
else:
    SECRET_KEY = env.str(
        "SECRET_KEY", default="django-insecure-development-only-key-never-in-production"
    )

ALLOWED_HOSTS = env.list(
    "ALLOWED_HOSTS", default=[] if PRODUCTION else ["127.0.0.1", "localhost", "testserver"]
)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

VAR_DIR = Path(env.str("SIGNALBOX_VAR_DIR", default=str(BASE_DIR / "var")))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "servestatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "channels",
    "guardian",
    # Serves django-ninja's docs page assets locally instead of from a CDN.
    "ninja",
    "axes",
    "csp",
    "audit",
    "orchestration",
    "policies",
    "console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "console.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "console.middleware.UserTimeZoneMiddleware",
    "console.middleware.PermissionsPolicyMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: it turns a lockout raised by the backend into its response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "console.urls"
ASGI_APPLICATION = "console.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "console.nav.nav",
            ],
        },
    },
]

# --- database -----------------------------------------------------------------------------------
DATABASE_URL = env.str("DATABASE_URL", default="")
EMBEDDED = not DATABASE_URL
if PRODUCTION and EMBEDDED:
    raise ImproperlyConfigured("production needs DATABASE_URL (PostgreSQL)")
if EMBEDDED:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES: dict[str, dict[str, Any]] = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "signalbox.sqlite3",
            # Threads share the file: IMMEDIATE transactions take the write lock up front instead
            # of failing with "database is locked" on upgrade; WAL lets readers run alongside.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
else:
    DATABASES = {"default": env.db_url_config(DATABASE_URL)}
    if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured(
            "DATABASE_URL must be a postgres:// URL (or unset for embedded mode)"
        )
    # Django's backend, plus: a batch a worker left in flight is read before the next statement.
    DATABASES["default"]["ENGINE"] = "infra.postgresql"
    # Workers keep their connection between tasks (a reconnect costs more than a step), and so
    # do the web process's request threads between requests (console/handlers.py keeps them,
    # as a WSGI server does); DB_POOL=true gives a pool instead, which needs CONN_MAX_AGE=0.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=300)
    DATABASES["default"].setdefault("OPTIONS", {})
    # A session left idle inside a transaction holds row locks; PostgreSQL ends it after this.
    DATABASES["default"]["OPTIONS"]["options"] = "-c idle_in_transaction_session_timeout=60000"
    if env.bool("DB_POOL", default=False):
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"]["OPTIONS"]["pool"] = {
            "min_size": 1,
            "max_size": env.int("DB_POOL_MAX", default=10),
        }
    test_name = env.str("DATABASE_TEST_NAME", default="")
    if test_name:
        DATABASES["default"]["TEST"] = {"NAME": test_name}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- auth ---------------------------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    # First, as django-axes asks: refuses a locked-out (username, address) before any other.
    "axes.backends.AxesStandaloneBackend",
    "console.auth.SingleQueryModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
ANONYMOUS_USER_NAME = None
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# Five failed logins for one username from one address lock that pair out for 15 minutes
# (django-axes; refusals answer 429 with the lockout page).
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = env.float("AXES_COOLOFF_HOURS", default=0.25)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
AXES_VERBOSE = False

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]

# Requests larger than this are refused before they reach a view (413 JSON from the API).
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=1_000_000)

# --- broker, channel layer ----------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if PRODUCTION and not REDIS_URL:
    raise ImproperlyConfigured("production needs REDIS_URL")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis, announcing joins and leaves (infra/channels.py).
            "BACKEND": "infra.channels.RedisChannelLayer",
            # A socket's read timeout beyond the layer's 5 s blocking read (redis-py 8 defaults
            # it to 5 s too: an idle console's receive then raced its own timeout and, losing,
            # closed the websocket).
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
                "capacity": 1000,
                "expiry": 30,
            },
        }
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # Unacked messages are redelivered after this long: it must exceed the longest step
        # (a step is also protected by its lease, so a duplicate delivery is harmless).
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CELERY_BROKER_URL = "memory://localhost/"
    # kombu's memory transport polls once a second by default (17 tasks/s); 5 ms makes it fast.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"polling_interval": 0.005}

# At-least-once delivery without loss: a message is acknowledged only after its task finished
# (acks_late); if the worker process dies the message goes back to the queue
# (reject_on_worker_lost); each worker process holds one unacknowledged message at a time
# (prefetch 1) so a dead process strands at most one. Step execution is idempotent (leases +
# fencing tokens in PostgreSQL), so a redelivered message never runs a step twice.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "pool.default"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery closes Django's DB connection around every task unless reuse is allowed; the engine's
# task closes unusable or expired connections itself (orchestration/tasks.py).
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1000)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "engine-tick": {
        "task": "orchestration.tasks.engine_tick",
        "schedule": env.float("SIGNALBOX_TICK_SECONDS", default=2.0),
    },
    "notifications-scan": {
        "task": "console.tasks.notifications_scan",
        "schedule": env.float("SIGNALBOX_NOTIFY_SCAN_SECONDS", default=10.0),
    },
}

# --- engine -------------------------------------------------------------------------------------
SIGNALBOX = {
    # A worker owns a claimed step for this long and renews it while the agent runs.
    "LEASE_SECONDS": env.float("SIGNALBOX_LEASE_SECONDS", default=30.0),
    # Queued steps whose wake-up message has not led to a claim by then are republished.
    "REPUBLISH_AFTER_SECONDS": env.float("SIGNALBOX_REPUBLISH_AFTER_SECONDS", default=30.0),
    # A step a worker hands off in a pool it serves waits this long for that worker to take it
    # itself before its wake-up message goes to the broker for any worker (0 = at once).
    "HANDOFF_HOLD_SECONDS": env.float("SIGNALBOX_HANDOFF_HOLD_SECONDS", default=0.02),
    # Transient-failure backoff: base * 2**(n-1), capped, full jitter.
    "RETRY_BASE_SECONDS": env.float("SIGNALBOX_RETRY_BASE_SECONDS", default=0.5),
    "RETRY_MAX_SECONDS": env.float("SIGNALBOX_RETRY_MAX_SECONDS", default=30.0),
    # Demo agents' simulated work is multiplied by this (0 = instant).
    "AGENT_TIME_SCALE": env.float("SIGNALBOX_AGENT_TIME_SCALE", default=1.0),
    # Runs submitted without a tenant belong to this one (created by the migrations).
    "DEFAULT_TENANT": env.str("SIGNALBOX_DEFAULT_TENANT", default="default"),
    # Payloads larger than this (bytes of JSON) are refused at the boundary.
    "MAX_PAYLOAD_BYTES": env.int("SIGNALBOX_MAX_PAYLOAD_BYTES", default=256_000),
    # Live events to the channel layer (off in benchmarks that measure the engine alone).
    "LIVE_EVENTS": env.bool("SIGNALBOX_LIVE_EVENTS", default=True),
    # Under a cost ceiling, a worker reserves this many calls' worst cases at once for the run
    # it works on (a budget block, spent call by call in its memory), where that leaves every
    # ceiling under its soft threshold; 1 = one reservation per call.
    "CEILING_BLOCK_CALLS": env.int("SIGNALBOX_CEILING_BLOCK_CALLS", default=8),
    # A worker settles the budget blocks it is done with this many at a time (the spend rows
    # every worker shares are then written once for them all), or when the first has waited
    # CEILING_SETTLE_SECONDS; 1 = each in the batch of its run's last completion there.
    "CEILING_SETTLE_TOGETHER": env.int("SIGNALBOX_CEILING_SETTLE_TOGETHER", default=8),
    "CEILING_SETTLE_SECONDS": env.float("SIGNALBOX_CEILING_SETTLE_SECONDS", default=0.5),
}
SIGNALBOX_AGENTS: dict[str, str] = env.dict("SIGNALBOX_EXTRA_AGENTS", default={})
SIGNALBOX_WORKFLOWS: list[str] = env.list("SIGNALBOX_EXTRA_WORKFLOWS", default=[])

if SIGNALBOX["LEASE_SECONDS"] <= 0:
    raise ImproperlyConfigured("SIGNALBOX_LEASE_SECONDS must be positive")
if not 1 <= SIGNALBOX["CEILING_BLOCK_CALLS"] <= 100:
    raise ImproperlyConfigured("SIGNALBOX_CEILING_BLOCK_CALLS must be between 1 and 100")
if not 1 <= SIGNALBOX["CEILING_SETTLE_TOGETHER"] <= 100:
    raise ImproperlyConfigured("SIGNALBOX_CEILING_SETTLE_TOGETHER must be between 1 and 100")
if not 0 < SIGNALBOX["CEILING_SETTLE_SECONDS"] <= 10:
    raise ImproperlyConfigured("SIGNALBOX_CEILING_SETTLE_SECONDS must be above 0 and at most 10")

# --- security -----------------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp 4): everything from this origin only, no inline scripts or
# styles, websockets to this host, never framed.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        # 'self' covers same-host websockets in CSP 3; older browsers need them spelt out.
        "connect-src": [
            "'self'",
            *(
                f"{scheme}://{host}"
                for host in ALLOWED_HOSTS
                if "*" not in host and not host.startswith(".")
                for scheme in (("wss",) if PRODUCTION else ("ws", "wss"))
            ),
        ],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
if PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
    if not SECURE_HSTS_PRELOAD:
        # Preloading is a commitment of the whole domain to browsers' HTTPS lists: an operator's
        # choice (SECURE_HSTS_PRELOAD=true), not a default, so its reminder is silenced.
        SILENCED_SYSTEM_CHECKS = ["security.W021"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # django-axes logs every login; failures and lockouts are in the audit trail instead.
        "axes": {"level": env.str("AXES_LOG_LEVEL", default="WARNING")},
        # Celery's "Task ... received" / "succeeded" lines, two per wake-up message: the engine's
        # audit trail records every claim and outcome, and at hundreds of steps a second these
        # lines cost log volume and time on every hop. CELERY_TASK_LOG_LEVEL=INFO shows them.
        "celery.worker.strategy": {"level": env.str("CELERY_TASK_LOG_LEVEL", default="WARNING")},
        "celery.app.trace": {"level": env.str("CELERY_TASK_LOG_LEVEL", default="WARNING")},
    },
}

SIGNALBOX_CAPABILITIES: dict[str, str] = env.dict("SIGNALBOX_EXTRA_CAPABILITIES", default={})

if SIGNALBOX_ENV == "test":
    # The test suite's own agents and workflows (tests/support/), visible to worker processes
    # started by the tests because they share this settings module and environment.
    SIGNALBOX_AGENTS.update(
        {
            "test_slow": "tests.support.agents:SlowAgent",
            "test_bad_output": "tests.support.agents:BadOutputAgent",
            "test_snoop": "tests.support.agents:SnoopAgent",
            "test_flaky": "tests.support.agents:FlakyAgent",
            "test_echo": "tests.support.agents:EchoAgent",
            "test_many": "tests.support.agents:ManyItemsAgent",
            "test_refund_issuer": "tests.support.agents:RefundIssuer",
            "test_fails_until": "tests.support.agents:FailsUntil",
            "test_backup": "tests.support.agents:BackupAgent",
            "test_partial": "tests.support.agents:PartialAgent",
            "test_sleepy": "tests.support.agents:SleepyAgent",
            "test_effect_action": "tests.support.agents:EffectAction",
            "test_effect_undo": "tests.support.agents:EffectUndo",
            "test_pure_echo": "tests.support.agents:PureEcho",
            "test_gated": "tests.support.agents:GatedAgent",
            "test_pure_effect": "tests.support.agents:PureEffect",
            "test_priced_pure": "tests.support.agents:PricedPureEcho",
            "test_priced_hangs_once": "tests.support.agents:PricedHangsOnce",
        }
    )
    SIGNALBOX_CAPABILITIES.update({"test_effect": "tests.support.stub_provider:registered_effect"})
    SIGNALBOX_WORKFLOWS = [
        *SIGNALBOX_WORKFLOWS,
        *(
            f"tests.support.workflows:{name}"
            for name in (
                "slow_then_echo",
                "priced_chain",
                "priced_hang",
                "priced_siblings",
                "priced_gated_siblings",
                "bad_handoff",
                "snooping",
                "flaky_chain",
                "event_timeout_continue",
                "event_timeout_fail",
                "parallel_approvals",
                "endless_review",
                "oversized_fanout",
                "approval_expiry",
                "approval_drift",
                "refund_once",
                "escalating",
                "with_fallback",
                "with_degraded",
                "sleepy",
                "retry_storm",
                "saga",
                "saga_waiting",
                "parallel_slow",
                "early_chain",
                "early_branches",
                "early_effect",
                "siblings",
                "pure_siblings",
                "pure_effect_siblings",
                "pure_map",
                "first_wins",
                "priced_chat",
                "tiered_refund",
            )
        ),
    ]

# --- SLA and notifications ------------------------------------------------------------------------
#: How long an open approval or escalation may wait at one tier before it escalates a tier.
SIGNALBOX_SLA_SECONDS = env.int("SIGNALBOX_SLA_SECONDS", default=30 * 60)
#: Where deep links in notifications point.
SIGNALBOX_BASE_URL = env.str("SIGNALBOX_BASE_URL", default="http://localhost:8000")
#: Items at or above this tier send an email and a webhook when they open or escalate.
SIGNALBOX_NOTIFY_MIN_TIER = env.int("SIGNALBOX_NOTIFY_MIN_TIER", default=2)
#: A Slack-compatible incoming webhook (none: no webhook is sent).
SIGNALBOX_NOTIFY_WEBHOOK_URL = env.str("SIGNALBOX_NOTIFY_WEBHOOK_URL", default="")
#: Addresses that get every email as well as the people who may decide the item.
SIGNALBOX_NOTIFY_EMAILS = env.list("SIGNALBOX_NOTIFY_EMAILS", default=[])
SIGNALBOX_NOTIFY_MAX_ATTEMPTS = env.int("SIGNALBOX_NOTIFY_MAX_ATTEMPTS", default=5)
#: The first retry waits this long; each further one twice as long.
SIGNALBOX_NOTIFY_BACKOFF_SECONDS = env.float("SIGNALBOX_NOTIFY_BACKOFF_SECONDS", default=30.0)
EMAIL_BACKEND = env.str(
    "EMAIL_BACKEND",
    default="django.core.mail.backends.smtp.EmailBackend"
    if SIGNALBOX_ENV == "production"
    # The embedded demo keeps its terminal for what it says: its mail goes to files in var/mail/.
    else "django.core.mail.backends.filebased.EmailBackend"
    if EMBEDDED
    else "django.core.mail.backends.console.EmailBackend",
)
EMAIL_FILE_PATH = env.str("EMAIL_FILE_PATH", default=str(VAR_DIR / "mail"))
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="signalbox@localhost")
