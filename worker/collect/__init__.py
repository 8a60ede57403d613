"""The collector (``cost-worker collect``): polls the OpenAI and Anthropic admin APIs and publishes their
buckets to the provider-bucket topic, so provider data arrives without every team writing a poller.

Data flows one way: ``keys`` (accounts and their admin keys) -> ``sources`` (what to ask each provider) ->
``client`` (HTTP with retries) -> ``windows`` (which window, every page of it) -> ``store`` (state and the staged
messages, one transaction per endpoint and poll) -> ``publisher`` (Kafka). ``runner`` drives the loop.
"""
