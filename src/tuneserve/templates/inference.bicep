// tuneserve: serve a base model and its LoRA adapters on Azure Container Apps (GPU).
// Parameters and outputs keep the AI Toolkit's inference template's names; infra/inference.json
// is the same template as ARM JSON (what `tuneserve provision` deploys).

@description('Commands that start the web API, joined with "; " and run by /bin/bash -c. The file share is mounted at /mount.')
param defaultCommands array

@description('The most GPU instances (replicas) the app scales out to.')
@minValue(1)
param maximumInstanceCount int = 1

@description('Where the resources go; default: the resource group\'s location.')
param location string = resourceGroup().location

@description('Storage account holding the share (default: the fine-tuning step\'s).')
@minLength(3)
@maxLength(24)
param storageAccountName string = 'aistorage${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('File share mounted at /mount: model-cache/, models/ and the tuneserve build.')
@minLength(3)
@maxLength(63)
param fileShareName string = 'aifileshare${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('Container Apps environment (default: the fine-tuning step\'s).')
param acaEnvironmentName string = 'aienv${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('The environment\'s storage entry over the file share.')
param acaEnvironmentStorageName string = 'aienvstorage${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('The Container App serving the inference API.')
@minLength(2)
@maxLength(32)
param acaAppName string = 'aiacaapp${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('Log Analytics workspace receiving the environment\'s logs.')
param acaLogAnalyticsName string = 'ailog${substring(uniqueString(resourceGroup().id), 0, 5)}'

var targetPort = 7860
var command = join(defaultCommands, '; ')
var volumeName = 'share'

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  sku: {
    name: 'Standard_LRS'
  }
  kind: 'StorageV2'
  properties: {
    largeFileSharesState: 'Enabled'
    minimumTlsVersion: 'TLS1_2'
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    shareDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource fileShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: fileShareName
  properties: {
    shareQuota: 1024
  }
}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: acaLogAnalyticsName
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: acaEnvironmentName
  location: location
  properties: {
    zoneRedundant: false
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logAnalytics.properties.customerId
        sharedKey: logAnalytics.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        workloadProfileType: 'Consumption'
        name: 'Consumption'
      }
      {
        workloadProfileType: 'NC24-A100'
        name: 'GPU'
        minimumCount: 0
        maximumCount: maximumInstanceCount
      }
    ]
  }
}

resource envStorage 'Microsoft.App/managedEnvironments/storages@2024-03-01' = {
  parent: environment
  name: acaEnvironmentStorageName
  properties: {
    azureFile: {
      accountName: storageAccount.name
      accountKey: storageAccount.listKeys().keys[0].value
      shareName: fileShare.name
      accessMode: 'ReadWrite'
    }
  }
}

resource acaApp 'Microsoft.App/containerApps@2024-03-01' = {
  name: acaAppName
  location: location
  properties: {
    environmentId: environment.id
    workloadProfileName: 'GPU'
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        allowInsecure: false
        targetPort: targetPort
        transport: 'auto'
        traffic: [
          {
            latestRevision: true
            weight: 100
          }
        ]
      }
    }
    template: {
      terminationGracePeriodSeconds: 30
      containers: [
        {
          name: 'inference'
          image: 'docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime'
          command: [
            '/bin/bash'
            '-c'
            command
          ]
          env: [
            {
              name: 'TUNESERVE_MOUNT'
              value: '/mount'
            }
            {
              name: 'GRADIO_ANALYTICS_ENABLED'
              value: 'False'
            }
            {
              name: 'HF_HOME'
              value: '/mount/cache/huggingface'
            }
          ]
          resources: {
            cpu: 24
            memory: '220Gi'
          }
          probes: [
            {
              type: 'Startup'
              httpGet: {
                path: '/ready'
                port: targetPort
                scheme: 'HTTP'
              }
              initialDelaySeconds: 30
              periodSeconds: 120
              timeoutSeconds: 5
              failureThreshold: 10
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/ready'
                port: targetPort
                scheme: 'HTTP'
              }
              periodSeconds: 10
              timeoutSeconds: 5
              successThreshold: 1
              failureThreshold: 3
            }
            {
              type: 'Liveness'
              httpGet: {
                path: '/health'
                port: targetPort
                scheme: 'HTTP'
              }
              periodSeconds: 15
              timeoutSeconds: 5
              failureThreshold: 4
            }
          ]
          volumeMounts: [
            {
              volumeName: volumeName
              mountPath: '/mount'
            }
          ]
        }
      ]
      scale: {
        minReplicas: 1
        maxReplicas: maximumInstanceCount
        rules: [
          {
            name: 'http-concurrency'
            http: {
              metadata: {
                concurrentRequests: '16'
              }
            }
          }
        ]
      }
      volumes: [
        {
          name: volumeName
          storageType: 'AzureFile'
          storageName: envStorage.name
        }
      ]
    }
  }
}

output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = storageAccount.name
output FILE_SHARE_NAME string = fileShare.name
output ACA_APP_NAME string = acaApp.name
output ACA_APP_ENDPOINT string = 'https://${acaApp.properties.configuration.ingress.fqdn}'
