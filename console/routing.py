"""Websocket routes (wrapped in origin and session checks by ``console.asgi``)."""

from django.urls import path

from console.consumers import (
    HomeConsumer,
    InboxConsumer,
    InboxItemConsumer,
    RunConsumer,
    RunListConsumer,
)

websocket_urlpatterns = [
    path("ws/runs/", RunListConsumer.as_asgi()),
    path("ws/runs/<int:run_id>/", RunConsumer.as_asgi()),
    path("ws/home/", HomeConsumer.as_asgi()),
    path("ws/inbox/", InboxConsumer.as_asgi()),
    path("ws/inbox/<int:wait_id>/", InboxItemConsumer.as_asgi()),
]
