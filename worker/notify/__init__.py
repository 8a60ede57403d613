"""Notify: deliver budget alerts to webhooks and Slack (``cost-worker notify``).

Data flows one way: the alerts topic -> ``consumer`` (one delivery row per matching destination, in the
transaction that stores the consumed offsets) -> ``dispatcher`` (claims due deliveries) -> ``sender`` (one
signed HTTP attempt) -> the delivery's new state. ``destinations`` and ``urls`` guard what may be added and
where a request may go; ``admin`` holds the operator commands.
"""
