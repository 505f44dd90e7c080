"""access-proxy: access enforcement at the edge for limited-preview model families."""
