defmodule PoolportDemoTest do
  use ExUnit.Case, async: false

  @config Path.expand("../py/poolport.yaml", __DIR__)

  setup_all do
    python = System.get_env("POOLPORT_PYTHON", "python3")
    {:ok, _} = Application.ensure_all_started(:poolport)

    # As a supervised child (:poolport.child_spec/1); ExUnit's test
    # supervisor stops it, and with it the Python process, after the tests.
    start_supervised!({:poolport, %{name: :py, config: @config, python: python}})
    :ok
  end

  test "echo round-trips an Elixir string" do
    assert :poolport.call(:py, :pp_handlers, :echo, ["World"]) == {:ok, "World"}
    assert :poolport.call(:py, :pp_handlers, :twice, [21], 5_000) == {:ok, 42}
  end

  test "typed handler: a binary arrives as str" do
    assert :poolport.call(:py, :demo_handlers, :greet, ["World"]) == {:ok, "Hello, World!"}
    assert :poolport.call(:py, :demo_handlers, :maybe, [false]) == {:ok, nil}
  end

  test "Python exception is a user error" do
    assert {:error, {:user, _, "ValueError", "boom", _trace}} =
             :poolport.call(:py, :pp_handlers, :fail, ["boom"])
  end

  test "info, cast, and a pool that does not exist" do
    assert %{workers: 2, status: :running} = :poolport.info(:py)
    assert :poolport.cast(:py, :pp_handlers, :echo, [1]) == :ok
    assert :poolport.call(:no_such_pool, :pp_handlers, :echo, [1]) == {:error, :noproc}
  end
end
