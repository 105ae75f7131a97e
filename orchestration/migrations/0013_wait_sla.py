from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0012_wait_claims")]

    operations = [
        migrations.AddField(
            model_name="wait", name="sla_due_at", field=models.DateTimeField(blank=True, null=True)
        ),
        migrations.AddField(
            model_name="wait", name="sla_breaches", field=models.SmallIntegerField(default=0)
        ),
    ]
