"""Which workspaces a request acts in: an API key is bound to one, a session to all of the user's."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import PermissionDenied, ValidationError

from twinmcp.models import ApiKey, Membership, Role, Workspace


def key_workspace_ids(request: Any) -> list[Any] | None:
    """The API key's workspace, or None (no restriction beyond membership) for sessions."""
    auth = getattr(request, "auth", None)
    return [auth.workspace_id] if isinstance(auth, ApiKey) else None


def resolve_workspace(request: Any, slug: str | None, *, admin: bool = False) -> Workspace:
    """The workspace a write targets: the named one, the key's, or the caller's only one."""
    memberships = Membership.objects.select_related("workspace").filter(user=request.user)
    restrict = key_workspace_ids(request)
    if restrict is not None:
        memberships = memberships.filter(workspace_id__in=restrict)
    if slug:
        memberships = memberships.filter(workspace__slug=slug)
    found = list(memberships[:2])
    if not found:
        target = f"workspace {slug!r}" if slug else "any workspace"
        raise ValidationError({"workspace": [f"You are not a member of {target}."]})
    if len(found) > 1:
        raise ValidationError({"workspace": ["You belong to several workspaces; name one by its slug."]})
    if admin and found[0].role != Role.ADMIN:
        raise PermissionDenied(f"Only admins of workspace {found[0].workspace.slug!r} can do this.")
    return found[0].workspace
