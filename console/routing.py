"""Websocket routes (wrapped in origin and session checks by ``console.asgi``)."""

from django.urls import path

from console.consumers import RunConsumer, RunListConsumer

websocket_urlpatterns = [
    path("ws/runs/", RunListConsumer.as_asgi()),
    path("ws/runs/<int:run_id>/", RunConsumer.as_asgi()),
]
