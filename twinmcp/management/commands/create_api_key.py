from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from twinmcp import services
from twinmcp.management.commands.createworkspace import validation_message
from twinmcp.models import Workspace


class Command(BaseCommand):
    help = "Create a TwinMCP API key for a user in a workspace; prints only the key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("slug")
        parser.add_argument("--name", default="cli")

    def handle(self, *args: Any, username: str, slug: str, name: str, **options: Any) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"User {username!r} does not exist.")
        workspace = Workspace.objects.filter(slug=slug).first()
        if workspace is None:
            raise CommandError(f"Workspace {slug!r} does not exist.")
        try:
            _, raw = services.api_key_create(user=user, workspace=workspace, name=name)
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None
        self.stdout.write(raw)
