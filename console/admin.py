"""Django admin additions for staff: workflow grants, API tokens (to revoke) and user settings.
Users and groups (roles, tiers) use Django's own admin; tenants are in ``policies.admin``."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import HttpRequest
from guardian.admin import GuardedModelAdmin

from console.accounts import token_revoke
from console.models import ApiToken, UserProfile
from orchestration.models import WorkflowRecord


@admin.register(WorkflowRecord)
class WorkflowRecordAdmin(GuardedModelAdmin):  # type: ignore[misc]  # guardian ships no types: its base class is Any
    """Who may decide a workflow's items: its "Object permissions" page."""

    list_display = ["name"]
    search_fields = ["name"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]  # generic in django-stubs, not subscriptable at run time
    list_display = [
        "name",
        "user",
        "prefix",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix", "user__username"]
    list_select_related = ["user"]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # made by their owner on the tokens page, or by manage.py service_account

    def has_change_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        for token in queryset.select_related("user"):
            token_revoke(token.user, token.pk)


@admin.register(UserProfile)
class UserProfileAdmin(admin.ModelAdmin):  # type: ignore[type-arg]  # as above
    list_display = ["user", "time_zone"]
    search_fields = ["user__username"]


class ConsoleUserAdmin(UserAdmin):  # type: ignore[type-arg]  # as above
    """Django's user admin, where staff who are not superusers manage people and their groups
    (roles and tiers) but cannot make anyone a superuser or hand out single permissions. The
    list shows each person's roles, so who holds which tier reads at a glance."""

    list_display = ["username", "email", "roles", "is_active", "is_staff", "last_login"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="Roles")
    def roles(self, user: User) -> str:
        return ", ".join(sorted(group.name for group in user.groups.all())) or "—"

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:
            fields += ["is_superuser", "user_permissions"]
        return fields


admin.site.unregister(User)
admin.site.register(User, ConsoleUserAdmin)
