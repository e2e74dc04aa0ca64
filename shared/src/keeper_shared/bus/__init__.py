"""RabbitMQ: the topology in one place, and the publish / consume / call helpers."""
