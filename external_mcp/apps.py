from django.apps import AppConfig


class ExternalMcpConfig(AppConfig):
    name = "external_mcp"
    default_auto_field = "django.db.models.BigAutoField"
