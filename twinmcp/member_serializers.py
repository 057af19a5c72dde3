"""Shapes of the members API (``twinmcp.member_api``)."""

from __future__ import annotations

from rest_framework import serializers

from twinmcp.models import Membership, Role


class MemberSerializer(serializers.ModelSerializer):
    user_id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    email = serializers.CharField(source="user.email", read_only=True)

    class Meta:
        model = Membership
        fields = ["user_id", "username", "email", "role", "created_at"]
        read_only_fields = fields


class MemberCreatedSerializer(MemberSerializer):
    password = serializers.CharField(read_only=True, allow_null=True,
                                     help_text="The generated initial password, shown once; null when you chose it.")

    class Meta(MemberSerializer.Meta):
        fields = [*MemberSerializer.Meta.fields, "password"]
        read_only_fields = fields


class MemberAddSerializer(serializers.Serializer):
    """Either ``user`` (an existing username or e-mail) or ``username`` (a new user)."""

    user = serializers.CharField(required=False, max_length=254, help_text="An existing user's username or e-mail.")
    username = serializers.CharField(required=False, max_length=150, help_text="Creates a new user.")
    email = serializers.EmailField(required=False, allow_blank=True, default="")
    password = serializers.CharField(required=False, allow_blank=True, default="", write_only=True,
                                     trim_whitespace=False, help_text="Initial password; empty generates one.")
    role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)

    def validate(self, attrs: dict) -> dict:
        if bool(attrs.get("user")) == bool(attrs.get("username")):
            raise serializers.ValidationError(
                {"user": ["Send either user (an existing user) or username (a new one)."]})
        return attrs


class MemberRoleSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices)
