from django.apps import AppConfig


class TwinMcpConfig(AppConfig):
    name = "twinmcp"
    verbose_name = "TwinMCP core"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from twinmcp import checks  # noqa: F401  (registers the system checks)
