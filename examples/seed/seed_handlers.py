"""The seed's three handlers, served in bare mode to the seed's unchanged porttest.erl."""


def twice(x):
    return 2 * int(x)


def sum(x, y):  # noqa: A001 - the seed's name
    return int(x) + int(y)


def hello(name):
    if isinstance(name, list):  # a charlist from Erlang's "World"
        name = bytes(name).decode()
    elif isinstance(name, bytes):
        name = name.decode()
    return f"Hello, {name}"
