"""The console's HTML pages and the login/logout views."""

from django.contrib.auth import views as auth_views
from django.urls import path

from console import (
    views,
    views_account,
    views_drills,
    views_inbox,
    views_policies,
    views_runs,
    views_saved,
)

app_name = "console"

urlpatterns = [
    path("", views_inbox.home, name="home"),
    path("runs/", views.run_list, name="run_list"),
    path("inbox/", views_inbox.inbox, name="inbox"),
    path("inbox/bulk/", views_inbox.inbox_bulk, name="inbox_bulk"),
    path("views/", views_saved.saved_views, name="saved_views"),
    path(
        "views/<int:view_id>/delete/",
        views_saved.saved_view_delete_view,
        name="saved_view_delete",
    ),
    path("inbox/<int:wait_id>/", views_inbox.inbox_item, name="inbox_item"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/retry/", views_runs.run_retry, name="run_retry"),
    path("runs/<int:run_id>/cancel/", views_runs.run_cancel, name="run_cancel"),
    path("runs/<int:run_id>/skip/", views_runs.run_skip, name="run_skip"),
    path("vendor/plotly-<str:version>.min.js", views_runs.plotly_js, name="plotly_js"),
    path("vendor/plotly-<str:version>.css", views_runs.plotly_css, name="plotly_css"),
    path("tools/", views.tool_list, name="tool_list"),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path(
        "accounts/logout/", auth_views.LogoutView.as_view(next_page="console:login"), name="logout"
    ),
    # Policies: versions, a version's actions, the editor, the diff and the simulation.
    path("policies/", views_policies.policy_list, name="policy_list"),
    path(
        "policies/versions/<int:version_id>/", views_policies.version_detail, name="policy_version"
    ),
    path(
        "policies/versions/<int:version_id>/simulate/",
        views_policies.version_simulate,
        name="policy_simulate",
    ),
    path(
        "policies/versions/<int:version_id>/<slug:action>/",
        views_policies.version_action,
        name="policy_version_action",
    ),
    path("policies/<slug:name>/", views_policies.version_list, name="policy_versions"),
    path("policies/<slug:name>/edit/", views_policies.policy_edit, name="policy_edit"),
    path("policies/<slug:name>/diff/", views_policies.policy_diff, name="policy_diff"),
    path("account/", views_account.account, name="account"),
    path("account/tokens/", views_account.tokens, name="account_tokens"),
    path(
        "account/tokens/<int:token_id>/revoke/",
        views_account.token_revoke_view,
        name="account_token_revoke",
    ),
    path("drills/", views_drills.drill_list, name="drill_list"),
]
