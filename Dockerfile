# The Yardmaster image: yard and nats-server on a base made by scripts/docker-images from
# this machine's files (no image is pulled). Build it with scripts/docker-images, which stages
# yard and nats-server into the build context docker/stage/ (docker-compose builds from there).
FROM yardmaster-base:dev
COPY yard nats-server /usr/local/bin/
ENV PATH=/usr/local/bin:/usr/bin:/bin
WORKDIR /var/lib/yard
ENTRYPOINT ["/usr/local/bin/yard"]
