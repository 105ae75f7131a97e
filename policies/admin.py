"""Django admin for policy admins (staff): tenants, and who may submit, see and decide for each
(object permissions, django-guardian's "Object permissions" page of a tenant)."""

from __future__ import annotations

from django.contrib import admin
from guardian.admin import GuardedModelAdmin

from policies.models import Tenant


@admin.register(Tenant)
class TenantAdmin(GuardedModelAdmin):
    list_display = ["slug", "name", "time_zone", "created_at"]
    search_fields = ["slug", "name"]
    readonly_fields = ["created_at"]
