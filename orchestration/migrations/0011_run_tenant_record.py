"""The tenant text column is replaced by the tenant record."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0010_tenants_from_text")]

    operations = [
        migrations.RemoveField(model_name="run", name="tenant"),
        migrations.RenameField(model_name="run", old_name="tenant_ref", new_name="tenant"),
        migrations.AlterField(
            model_name="run",
            name="tenant",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="+", to="policies.tenant"
            ),
        ),
    ]
