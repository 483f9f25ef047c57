from django.contrib import admin
from django.urls import path

from emg.views import health, health_detail, metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health, name="health"),
    path("health/detail", health_detail, name="health-detail"),
    path("metrics", metrics, name="metrics"),
]
