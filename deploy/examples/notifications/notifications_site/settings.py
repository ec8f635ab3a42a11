"""Settings of the notifications example: Django + Channels + Daphne on channels-broker.

Everything a deployment would change comes from the environment:
``CHANNELS_BROKER_URL`` (the daemon), ``NOTIFICATIONS_DB`` (the SQLite file),
``DJANGO_SECRET_KEY`` and ``DJANGO_DEBUG``.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A demo key; set DJANGO_SECRET_KEY for anything but a local try.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret-" + "x" * 40)
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "daphne",  # first, so `manage.py runserver` serves WebSockets too
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "channels",
    "broker.layer",  # manage.py check validates CHANNEL_LAYERS
    "notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "notifications_site.urls"
ASGI_APPLICATION = "notifications_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("NOTIFICATIONS_DB", str(BASE_DIR / "db.sqlite3")),
    }
}

# The channel layer: every Daphne process, worker and management command talks to
# the channels-broker daemon instead of to Redis directly.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "broker.layer.BrokerChannelLayer",
        "CONFIG": {
            "hosts": [os.environ.get("CHANNELS_BROKER_URL", "tcp://127.0.0.1:7733")],
            "token": os.environ.get("CHANNELS_BROKER_TOKEN") or None,
        },
    }
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "notifications"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
