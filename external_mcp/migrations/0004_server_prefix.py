from django.db import migrations, models

from external_mcp.exposed_names import derive_prefix


def derive_prefixes(apps, schema_editor):
    """Each existing server gets the prefix a new one would: from its name, unique in its workspace,
    the oldest server first."""
    Server = apps.get_model("external_mcp", "ExternalMcpServer")
    taken: dict[object, set[str]] = {}
    for server in Server.objects.order_by("created_at", "id").only("id", "workspace_id", "name"):
        used = taken.setdefault(server.workspace_id, set())
        server.prefix = derive_prefix(server.name, used)
        used.add(server.prefix)
        server.save(update_fields=["prefix"])


class Migration(migrations.Migration):
    dependencies = [
        ("external_mcp", "0003_tool_refusals_stale_status_email_retries"),
    ]

    operations = [
        migrations.AddField(
            model_name="externalmcpserver",
            name="prefix",
            field=models.CharField(default="", help_text="Its tools' names where several servers meet: "
                                   "<prefix>__<tool> (external_mcp.exposed_names).", max_length=24),
            preserve_default=False,
        ),
        migrations.RunPython(derive_prefixes, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="externalmcpserver",
            constraint=models.UniqueConstraint(models.F("workspace"), models.F("prefix"),
                                               name="external_mcp_server_prefix_unique"),
        ),
    ]
