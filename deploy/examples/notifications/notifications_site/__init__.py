"""The Django project of the notifications example."""
