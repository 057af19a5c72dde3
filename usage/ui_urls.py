"""The usage dashboard page (its data comes from the usage API, fetched by the browser)."""

from django.urls import path

from usage import views

urlpatterns = [
    path("usage/", views.dashboard, name="usage-ui-dashboard"),
]
