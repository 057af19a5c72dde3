from __future__ import annotations

from rest_framework import serializers

from twinmcp.models import ApiKey


class ApiKeySerializer(serializers.ModelSerializer):
    workspace = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    is_active = serializers.BooleanField(read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id", "name", "prefix", "workspace", "created_at", "last_used_at", "expires_at", "revoked_at",
            "is_active",
        ]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False, default="default")
    workspace = serializers.SlugField(
        required=False, help_text="Workspace slug; defaults to the calling key's workspace."
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="Shown once; store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields
