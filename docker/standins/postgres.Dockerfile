# Stand-in for postgres:17.6 where no registry can be reached: Debian's PostgreSQL server behind an
# entry point that reads POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and initialises
# /var/lib/postgresql/data on first start, the way the official image does.
FROM localhost/debian:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin
ENV PATH=/usr/lib/postgresql/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
EXPOSE 5432
CMD ["postgres"]
