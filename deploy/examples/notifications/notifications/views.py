"""Plain sync views: the pages, and one that sends a notification through the broker."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_POST

from broker.layer import BrokerUnavailable

from .messaging import send_message

__all__ = ["chat_page", "notifications_page", "notify"]


@login_required
def notifications_page(request: HttpRequest) -> HttpResponse:
    users = get_user_model().objects.order_by("username").values_list("username", flat=True)
    return render(request, "notifications/notifications.html", {"usernames": list(users)})


@login_required
@require_POST
def notify(request: HttpRequest) -> HttpResponse:
    """POST ``to`` (a username) and ``text``: notify that user's open pages."""
    recipient = get_object_or_404(get_user_model(), username=request.POST.get("to", ""))
    text = request.POST.get("text", "").strip()
    if not text:
        return JsonResponse({"ok": False, "error": "text is empty"}, status=400)
    try:
        send_message(recipient, {"text": text, "source": "view", "sender": request.user.username})
    except BrokerUnavailable as exc:
        # The layer reconnects by itself; the caller may simply try again.
        return JsonResponse({"ok": False, "error": str(exc)}, status=503)
    return JsonResponse({"ok": True})


@login_required
def chat_page(request: HttpRequest, room: str) -> HttpResponse:
    return render(request, "notifications/chat.html", {"room": room})
