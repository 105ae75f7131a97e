"""The console's HTML pages and the login/logout views."""

from django.contrib.auth import views as auth_views
from django.urls import path

from console import views, views_runs

app_name = "console"

urlpatterns = [
    path("", views.run_list, name="run_list"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/retry/", views_runs.run_retry, name="run_retry"),
    path("runs/<int:run_id>/cancel/", views_runs.run_cancel, name="run_cancel"),
    path("vendor/plotly-<str:version>.min.js", views_runs.plotly_js, name="plotly_js"),
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
