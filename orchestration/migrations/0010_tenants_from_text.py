"""A run's tenant was free text; every text seen becomes a tenant record (an empty one: the
default tenant)."""

from django.db import migrations

DEFAULT_TENANT = "default"


def tenants_from_text(apps, schema_editor):
    from django.utils.text import slugify

    Tenant = apps.get_model("policies", "Tenant")
    Run = apps.get_model("orchestration", "Run")
    default, _ = Tenant.objects.get_or_create(slug=DEFAULT_TENANT, defaults={"name": "Default"})
    by_text = {}
    for text in Run.objects.values_list("tenant", flat=True).distinct():
        slug = slugify(text)[:100] or DEFAULT_TENANT
        by_text[text] = Tenant.objects.get_or_create(
            slug=slug, defaults={"name": text or "Default"}
        )[0]
    for text, tenant in by_text.items():
        Run.objects.filter(tenant=text).update(tenant_ref=tenant)
    Run.objects.filter(tenant_ref__isnull=True).update(tenant_ref=default)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0009_tenants_tiers_votes")]

    operations = [migrations.RunPython(tenants_from_text, migrations.RunPython.noop)]
