"""A wait carries its run's tenant (filled in from the run for every existing wait), and runs are
indexed by (tenant, status) in place of the tenant alone: a tenant-scoped user's home and inbox
then count and list without reading every run of their tenants."""

import django.db.models.deletion
from django.db import migrations, models


def tenants_from_runs(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        # The foreign key's check is deferred to the commit by default; a table with checks
        # pending cannot be altered, and the next operation makes the column NOT NULL.
        schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    Wait = apps.get_model("orchestration", "Wait")
    Run = apps.get_model("orchestration", "Run")
    Wait.objects.update(
        tenant=models.Subquery(Run.objects.filter(pk=models.OuterRef("run_id")).values("tenant"))
    )


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0014_wait_open_due_index"),
        ("policies", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="wait",
            name="tenant",
            field=models.ForeignKey(
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="policies.tenant",
            ),
        ),
        migrations.RunPython(tenants_from_runs, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="wait",
            name="tenant",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="policies.tenant",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["tenant", "status"], name="run_tenant_status_idx"),
        ),
        migrations.AlterField(
            model_name="run",
            name="tenant",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="policies.tenant",
            ),
        ),
    ]
