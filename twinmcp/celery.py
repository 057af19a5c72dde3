"""Celery app: broker from REDIS_URL or kombu's filesystem transport; beat schedule in settings."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twinmcp.settings")

app = Celery("twinmcp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
