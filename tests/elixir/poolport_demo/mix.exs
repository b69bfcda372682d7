defmodule PoolportDemo.MixProject do
  use Mix.Project

  # Smoke test of the Erlang client (../../../erlang) used from Elixir.
  # Run it with ../run.sh.
  def project do
    [
      app: :poolport_demo,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: false,
      deps: deps()
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end

  defp deps do
    # Built by rebar3: the system one via MIX_REBAR3 (see ../run.sh), since
    # `mix local.rebar` would download it from the package registry.
    [{:poolport, path: "../../../erlang", manager: :rebar3}]
  end
end
