"""factory-boy factories for test data. Runs are never built here: submit them with
``orchestration.services.run_submit`` so every row a run owns exists as in production."""

from __future__ import annotations

from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone


class UserFactory(factory.django.DjangoModelFactory):
    """A user; ``permissions=["orchestration.view_run", ...]`` grants global permissions."""

    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.django.Password("correct horse battery staple")
    is_active = True

    @factory.post_generation
    def permissions(self, create: bool, extracted: list[str] | None, **kwargs: Any) -> None:
        if not create or not extracted:
            return
        for name in extracted:
            app_label, _, codename = name.partition(".")
            self.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )


class TenantFactory(factory.django.DjangoModelFactory):
    """A tenant (the migrations create the default one)."""

    class Meta:
        model = "policies.Tenant"
        django_get_or_create = ("slug",)
        skip_postgeneration_save = True

    slug = factory.Sequence(lambda n: f"tenant-{n}")
    name = factory.LazyAttribute(lambda tenant: tenant.slug.replace("-", " ").title())
    time_zone = "UTC"


class PolicyDecisionFactory(factory.django.DjangoModelFactory):
    """A decision the engine recorded; ``facts`` as ``Facts.to_json()`` writes them (give at
    least ``action``). What simulation replays a draft against."""

    class Meta:
        model = "policies.PolicyDecision"
        skip_postgeneration_save = True

    action = factory.LazyAttribute(lambda decision: decision.facts["action"])
    facts = factory.LazyFunction(lambda: {"action": "agent:refund_executor", "params": {}})
    outcome = "allow"
    tier = 0
    rule = ""
    reason = ""
    created_at = factory.LazyFunction(timezone.now)
