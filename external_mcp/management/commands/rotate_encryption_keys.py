from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from external_mcp import services


class Command(BaseCommand):
    help = "Re-encrypt every stored credential with the first key of TWINMCP_ENCRYPTION_KEYS."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=200)

    def handle(self, *args: Any, batch_size: int, **options: Any) -> None:
        changed, still_old = services.credentials_reencrypt_all(batch_size=batch_size)
        self.stdout.write(f"re-encrypted {changed} credential(s); {still_old} still use an old key")
        if still_old:
            self.stderr.write(
                "Some credentials could not be decrypted with any key in TWINMCP_ENCRYPTION_KEYS: "
                "their servers show the error; set their secrets again (see docs/runbook.md)."
            )
