"""Tenants as the engine sees them: looked up by slug or id, cached for the life of a process
(a tenant's slug and id never change; its time zone may, and is read again after a minute)."""

from __future__ import annotations

import threading
import time

from django.conf import settings

from policies.models import Tenant

#: How long a cached tenant is trusted (its time zone or name may be edited).
CACHE_SECONDS = 60.0

_lock = threading.Lock()
_by_slug: dict[str, tuple[float, Tenant]] = {}
_by_id: dict[int, tuple[float, Tenant]] = {}


class UnknownTenant(LookupError):
    """No tenant has that slug."""


def default_tenant_slug() -> str:
    return str(settings.SIGNALBOX.get("DEFAULT_TENANT", "default"))


def tenant_by_slug(slug: str | None) -> Tenant:
    """The tenant ``slug`` names (the default tenant for an empty one); UnknownTenant if none."""
    slug = slug or default_tenant_slug()
    now = time.monotonic()
    with _lock:
        cached = _by_slug.get(slug)
    if cached is not None and now - cached[0] < CACHE_SECONDS:
        return cached[1]
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None and slug == default_tenant_slug():
        # The migrations create it; a database emptied since (a test's flush) gets it back.
        tenant = Tenant.objects.get_or_create(slug=slug, defaults={"name": "Default"})[0]
    if tenant is None:
        raise UnknownTenant(slug)
    _remember(tenant, now)
    return tenant


def tenant_by_id(tenant_id: int) -> Tenant:
    now = time.monotonic()
    with _lock:
        cached = _by_id.get(tenant_id)
    if cached is not None and now - cached[0] < CACHE_SECONDS:
        return cached[1]
    tenant = Tenant.objects.get(pk=tenant_id)
    _remember(tenant, now)
    return tenant


def _remember(tenant: Tenant, now: float) -> None:
    with _lock:
        _by_slug[tenant.slug] = (now, tenant)
        _by_id[tenant.pk] = (now, tenant)


def tenants_forget() -> None:
    """Drop the cache (tests; an admin's edit in this process)."""
    with _lock:
        _by_slug.clear()
        _by_id.clear()
