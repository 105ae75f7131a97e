"""The console's HTML pages and the login/logout views."""

from django.contrib.auth import views as auth_views
from django.urls import path

from console import views, views_inbox

app_name = "console"

urlpatterns = [
    path("", views_inbox.home, name="home"),
    path("runs/", views.run_list, name="run_list"),
    path("inbox/", views_inbox.inbox, name="inbox"),
    path("inbox/bulk/", views_inbox.inbox_bulk, name="inbox_bulk"),
    path("inbox/<int:wait_id>/", views_inbox.inbox_item, name="inbox_item"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("tools/", views.tool_list, name="tool_list"),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path(
        "accounts/logout/", auth_views.LogoutView.as_view(next_page="console:login"), name="logout"
    ),
]
