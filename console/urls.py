from django.contrib import admin
from django.urls import include, path, re_path

from console.api import api_not_found, api_urls

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", api_urls()),
    # Anything else under /api/ answers with a JSON 404, not the site's HTML page.
    re_path(r"^api/(?P<path>.*)$", api_not_found),
    path("", include("console.urls_pages")),
]
