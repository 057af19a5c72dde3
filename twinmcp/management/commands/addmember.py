from __future__ import annotations

import sys
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from twinmcp import services
from twinmcp.management.commands.createworkspace import validation_message
from twinmcp.models import PlanCode, Role, Workspace


class Command(BaseCommand):
    help = "Add a user to a workspace with a role (optionally creating the user)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=Role.values)
        parser.add_argument("--create", action="store_true", help="Create the user if missing.")
        parser.add_argument("--password-stdin", action="store_true", help="Read the password from stdin.")
        parser.add_argument("--email", default="")
        parser.add_argument("--plan", choices=PlanCode.values)

    def handle(self, *args: Any, **opts: Any) -> None:
        workspace = Workspace.objects.filter(slug=opts["slug"]).first()
        if workspace is None:
            raise CommandError(f"Workspace {opts['slug']!r} does not exist; create it with createworkspace.")
        user_model = get_user_model()
        password = None
        if opts["password_stdin"]:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("--password-stdin was given but no password was read from stdin.")
        user = user_model.objects.filter(username=opts["username"]).first()
        if user is None and not opts["create"]:
            raise CommandError(f"User {opts['username']!r} does not exist; pass --create to create it.")
        try:
            with transaction.atomic():
                if user is None:
                    user = user_model(username=opts["username"], email=opts["email"])
                    user.set_unusable_password()
                if password is not None:
                    validate_password(password, user)
                    user.set_password(password)
                user.save()
                services.member_add(workspace=workspace, user=user, role=opts["role"])
                if opts["plan"]:
                    services.profile_set_plan(user=user, code=opts["plan"])
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None
        self.stdout.write(f"{user.username} is {opts['role']} of {workspace.slug}")
