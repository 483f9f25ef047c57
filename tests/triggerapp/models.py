from django.db import models


class Parcel(models.Model):
    """Sent to a courier (a flow run) once it is paid; the run notes who delivered it."""

    class Status(models.TextChoices):
        NEW = "NEW"
        PAID = "PAID"
        DELIVERED = "DELIVERED"

    label = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW)
    delivered_by = models.CharField(max_length=200, blank=True)
    deliveries = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"parcel #{self.pk} ({self.label})"
