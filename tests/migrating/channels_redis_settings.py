"""The example site's settings as a site on channels_redis has them (the test's "before").

tests/migrating/test_migrating_doc.py runs the site's consumers with these settings on
Redis, applies the change docs/migrating.md shows, exactly as written there, and runs
them again on a channels-broker daemon. Everything a deployment would change comes from
the environment: ``REDIS_HOST``/``REDIS_PORT``, ``CHANNEL_LAYER_PREFIX``,
``NOTIFICATIONS_DB``, ``DJANGO_SECRET_KEY`` and ``DJANGO_DEBUG``.
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

# The channel layer: every Daphne process, worker and management command talks to Redis.
REDIS_HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [(REDIS_HOST, REDIS_PORT)],
            "prefix": os.environ.get("CHANNEL_LAYER_PREFIX", "notifications"),
            "capacity": 200,
            "expiry": 30,
            "group_expiry": 3600,
            "channel_capacity": {"http.request": 500, "websocket.send*": 50},
            "symmetric_encryption_keys": [SECRET_KEY],
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
