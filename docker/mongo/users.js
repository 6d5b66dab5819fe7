// Runs once, when the mongo container initialises an empty data volume (mounted into
// /docker-entrypoint-initdb.d, run by the image's entrypoint as the root user it has just made
// from MONGO_INITDB_ROOT_USERNAME / MONGO_INITDB_ROOT_PASSWORD). Creates the consumer's own user:
// readWrite on the `consumer` database only, nothing on any other database, no admin rights.
const user = process.env.MONGO_CONSUMER_USER || 'consumer';
const password = process.env.MONGO_CONSUMER_PASSWORD;
if (!password) {
  throw new Error('MONGO_CONSUMER_PASSWORD is not set: copy .env.example to .env and set it');
}
const database = process.env.MONGO_CONSUMER_DATABASE || 'consumer';
db.getSiblingDB('admin').createUser({
  user,
  pwd: password,
  roles: [{ role: 'readWrite', db: database }],
});
print(`pgevents: MongoDB user ${user} (readWrite on ${database}) ready`);
