from django.db import migrations


def seed(apps, schema_editor):
    Plan = apps.get_model("twinmcp", "Plan")
    Plan.objects.get_or_create(code="free", defaults={"name": "Free", "capped": True})
    Plan.objects.get_or_create(code="pro", defaults={"name": "Pro", "capped": False})
    Flag = apps.get_model("waffle", "Flag")
    Flag.objects.get_or_create(
        name="external_mcp_connect",
        defaults={"note": "Connect external MCP servers (story 10.12). Switch on per workspace."},
    )


class Migration(migrations.Migration):
    dependencies = [("twinmcp", "0001_initial"), ("waffle", "0004_update_everyone_nullbooleanfield")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
