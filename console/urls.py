from django.contrib import admin
from django.urls import include, path, re_path

from console.api import api_not_found, api_urls

# Under /api/ these answer in the API's JSON error shape, elsewhere with Django's pages.
handler400 = "console.api.bad_request_page"
handler403 = "console.api.permission_denied_page"
handler500 = "console.api.server_error_page"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", api_urls()),
    # Anything else under /api/ answers with a JSON 404, not the site's HTML page.
    re_path(r"^api/(?P<path>.*)$", api_not_found),
    path("", include("console.urls_pages")),
]
