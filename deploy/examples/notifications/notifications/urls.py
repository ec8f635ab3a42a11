"""HTTP routes of the notifications app."""

from __future__ import annotations

from django.urls import path, re_path

from . import views

urlpatterns = [
    path("", views.notifications_page, name="notifications"),
    path("notify/", views.notify, name="notify"),
    re_path(r"^chat/(?P<room>[-a-zA-Z0-9_.]{1,50})/$", views.chat_page, name="chat"),
]
